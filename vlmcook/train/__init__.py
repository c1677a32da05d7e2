"""Training: data (SFT records, mixture, batches, packing)."""

from vlmcook.train.data import (DataError, JsonlRecords, JsonlSource, ListRecords, Mixture, RecordSource, SkipLog,
                                collate_batch, pack, pack_rows, record_to_messages)

__all__ = ["DataError", "JsonlRecords", "JsonlSource", "ListRecords", "Mixture", "RecordSource", "SkipLog",
           "collate_batch", "pack", "pack_rows", "record_to_messages"]
