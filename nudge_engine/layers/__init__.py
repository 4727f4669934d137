"""The model's building blocks, shared by model/families/ and the Triton kernels in kernels/.

attention*.py (paged attention: spec, metadata, torch reference backend), decoder.py, linear.py, mlp.py,
norm.py, rotary.py, forward_context.py; parallel.py (which tensor-parallel shard a model being built is, and
its torch.distributed collectives) and embedding.py (vocabulary-parallel embedding and head). kernels/ imports these as its references, so they stay here,
beside model/, rather than inside it.

May import: model/config.py, kernels/ (lazily, for the Triton backend). Never engine/, pairing/, server/, distributed/.
"""
