"""The classroom page: the built-in model exported for the browser (``sdlens web``).

``export.write_page`` writes the page and the model's files; ``schedule`` turns the model's sampler
into per-step coefficients the page applies.
"""
