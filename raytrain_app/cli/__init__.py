"""Pieces shared by the command-line front ends (`raytrain_app.main`, `.tune`, `.jobs`, `.ckpt`, `.report`,
`.data`): flags generated from the config dataclasses, the checks made before Ray starts, the commands printed
for users to copy, and one way to turn any error into one line and an exit code. Only the front ends import
it."""
