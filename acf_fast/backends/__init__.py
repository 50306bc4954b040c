"""Implementations of ACF's hot path; `acf_fast.backends.registry` chooses among them."""
