"""The early-exit model: attaching branches to a backbone, running it stage by stage, checkpoint I/O."""
