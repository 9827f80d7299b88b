"""What a batch dict means to every stage: example ids."""

from __future__ import annotations


def batch_ids(batch: dict, n: int, start: int) -> list:
    """One id per example: the batch's ``ids`` / ``id`` as Python str/int, else ``start .. start + n``."""
    ids = batch.get("ids", batch.get("id"))
    if ids is None:
        return list(range(start, start + n))
    if hasattr(ids, "tolist"):  # torch tensor or numpy array
        ids = ids.tolist()
    elif isinstance(ids, (str, int)):
        ids = [ids]
    ids = [i.item() if hasattr(i, "item") else i for i in ids]  # numpy / torch scalars
    if len(ids) != n:
        raise ValueError(f"batch 'ids' has {len(ids)} entries for {n} examples; give one id per example")
    bad = [i for i in ids if not isinstance(i, (str, int))]
    if bad:
        raise ValueError(
            f"example ids must be str or int (they are stored as JSON), got {type(bad[0]).__name__}: {bad[0]!r}"
        )
    return ids
