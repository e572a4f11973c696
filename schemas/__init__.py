"""Data in front of every GPU hour: pandera schemas, loaders for the formats users bring, digests and splits.

    from schemas import load_rows, DataValidationError
    data = load_rows("data/support_bot/preferences.jsonl", "preference")   # or raises, naming every bad row
    data.rows, data.digest, data.format

See docs/data.md for the formats, the rules and the bundled task.
"""

from schemas.errors import DataValidationError, Failure, ValidationReport
from schemas.formats import FORMATS, detect_format, parse_hh_transcript, split_shared_prefix
from schemas.loaders import LoadedData, load_rows
from schemas.models import COLUMNS, KINDS, canonical_json, schema_for, validate_rows
from schemas.readers import read_source
from schemas.rows import content_digest, ranking_to_pairs, train_eval_split
from schemas.rules import DataLimits

__all__ = [
    "COLUMNS",
    "FORMATS",
    "KINDS",
    "DataLimits",
    "DataValidationError",
    "Failure",
    "LoadedData",
    "ValidationReport",
    "canonical_json",
    "content_digest",
    "detect_format",
    "load_rows",
    "parse_hh_transcript",
    "ranking_to_pairs",
    "read_source",
    "schema_for",
    "split_shared_prefix",
    "train_eval_split",
    "validate_rows",
]
