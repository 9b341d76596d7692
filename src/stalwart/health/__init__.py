"""Health: the debugging playbook, live. detectors.py names the symptoms, trends.py and
monitor.py decide (per step, before the update), recovery.py acts (skip, roll back, stop),
doctor.py re-runs the detectors over finished runs, dashboard*.py draws the five panels."""
