"""Memory: predict a training step's peak from the config, choose the micro-batch, measure it.

One direction, bottom to top:
    measure      PeakMemory and the metrics' memory_record (what a step really holds)
    inventory    what one step of the GPT-2 block keeps, per block and checkpointing kind
    replay       that step replayed as allocations and frees
    planner      training_memory / inference_memory from a StepSpec (config slices + facts)
    budget       the memory available, the largest micro-batch, auto and the refusal
    plan_table   the lesson's model-scale table
    plan         `stalwart plan`: the report and its formatting
"""
