"""Model file formats besides Hugging Face folders: GGUF (llama.cpp's single-file format), read and written
through llama.cpp's own ``gguf`` Python package (an optional dependency: ``pip install gguf``)."""
