"""`longctx bench ...`: kernels (SSD scan), data (prepare + loader), train (tokens/s), sp
(sequence-parallel step time and traffic)."""
