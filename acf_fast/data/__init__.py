"""Data: synthetic Wikimedia-shaped datasets, the tutorial's file formats, and its sampling."""

from .formats import (EvaluationGroups, Interactions, TripletSet, read_evaluation, read_interactions,
                      read_triplets)
from .history import UserHistory

__all__ = ["EvaluationGroups", "Interactions", "TripletSet", "UserHistory", "read_evaluation",
           "read_interactions", "read_triplets"]
