"""Checkpoints: full training state, safe on disk, saved and resumed by the loop.

format.py       the on-disk layout, atomic writes, verification (statetree.py: no pickle)
state.py        what a checkpoint holds (TrainParts, LoopState) and putting it back
backend.py      one process or every rank of a distributed run (distributed.py), chosen once
saver.py        CheckpointSaver: when to save, the (asynchronous) write, retention.py's rotation
resumer.py      Resumer: resume a run (resume.py: which checkpoint, the self-check), rollback
cli.py          `stalwart ckpt list|verify`
"""
