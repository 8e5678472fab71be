"""Tools that make model files rather than run them: ``quantize`` (``ggml-backend quantize``)."""
