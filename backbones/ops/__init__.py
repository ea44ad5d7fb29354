"""Building blocks that are not models: gamma by Taylor series, and (as tasks land) the selective
scan, sliding-window and plane attention, voxel hashing."""
