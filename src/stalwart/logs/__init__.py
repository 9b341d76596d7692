"""stalwart.logs."""
