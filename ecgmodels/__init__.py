"""Plain-PyTorch ECG architectures with a shared backbone/head split, transfer and checkpoints."""
