"""The TEE side: the split model that walks the schedule, its client of the GPU side, and
sampling. Never imports the GPU side (:mod:`tsqp_core.gpu`, executor backends, CUDA)."""
