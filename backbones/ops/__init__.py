"""Building blocks that are not models: gamma by Taylor series (``taylor_gamma``), the selective
scan (``selective_scan``), and (as tasks land) sliding-window and plane attention, voxel hashing.
Import from the submodules (``from backbones.ops.selective_scan import selective_scan``)."""
