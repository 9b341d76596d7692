"""stalwart.memory.planner."""
