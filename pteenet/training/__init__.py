"""Training the branches on a frozen backbone: the loop, the step, its config, the loss, batch sources, feature caches, DDP."""
