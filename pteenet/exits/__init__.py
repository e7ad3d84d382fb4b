"""What sits at an exit: the branch modules, their folded inference form, the cascade/ensemble step, the policies."""
