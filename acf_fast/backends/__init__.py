"""Implementations of ACF's hot path; `acf_fast.backend` chooses among them."""
