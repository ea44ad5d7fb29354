"""Building blocks that are not models: gamma by Taylor series, the selective scan, and (as tasks
land) sliding-window and plane attention, voxel hashing."""

from backbones.ops.selective_scan import selective_scan, selective_scan_sequential

__all__ = ["selective_scan", "selective_scan_sequential"]
