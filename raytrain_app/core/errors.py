"""The one error type every layer raises for a mistake in what the user gave."""


class UserError(Exception):
    """A mistake in the user's input: the commands print it as one line and exit with code 2, with nothing
    written. The message names the input and says what to do."""
