"""``rayconv export``: a MaxText Orbax checkpoint → Hugging Face safetensors, with the convert engine.

* :mod:`.model` — which model the export describes (``--model_name`` as MaxText names it, or an HF config.json),
  the HF config.json / generation_config.json it writes, and the check of the checkpoint's leaves against it;
* :mod:`.plan` — pure: spec + family rules + the checkpoint's leaves + the safetensors file plan → pieces (rows of
  one HF tensor, the source region they come from, the byte range they go to) grouped into units;
* :mod:`.worker` — one unit: read the regions (only their chunks), invert the transform, write the bytes in place;
* :mod:`.driver` — open, check, plan, lock, resume, run the units on the executor, publish the files, write the
  small files, the index (or config.json) last.
"""
