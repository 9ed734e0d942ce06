"""The Ray-free core: the one config (`TrainConfig`), the model, the learning-rate schedule, RNG streams, the
interrupt agreement between ranks and `Trainer` (the training state and the loop). Plain PyTorch and
torch.distributed only: it runs the same under Ray, in a benchmark's single process and in a unit test. It
imports `datasets` and nothing else of the package, and never Ray."""
