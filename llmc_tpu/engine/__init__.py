"""Running a model one decoder block at a time."""
