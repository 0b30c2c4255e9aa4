"""Triton kernels and their host launchers, one module per op family. Imported only when the
``triton`` backend runs (``import ssam_kernels`` never imports Triton)."""
