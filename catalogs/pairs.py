"""Cross-image subject pairs: the same subject in two different images, one row per directed pair.

    pairs.parquet (PAIR_SCHEMA)
        ref_key, ref_index        the reference object: its record key and position in the record's objects
        target_key, target_index  the target object, in another image
        label                     the (shared) label of the two objects
        method                    "video" | "retrieval" (how the pair was mined)
        similarity                cosine of the two objects' identity embeddings (catalogs/identity.py)
        frame_gap                 |target frame - reference frame| for video pairs, null for retrieval pairs
        change                    how different the two appearances are, in [0, 1]: 1 - the IoU of the two
                                  boxes after aligning their centres and scales is 0 for a pure move or zoom;
                                  the pair is worth learning from when the pixels changed (see phash_distance)
        phash_distance            Hamming distance of the two images' 64-bit phashes (0 = near-duplicate frames)

A pair (a, b) is stored in both directions, (a -> b) and (b -> a): either object can be the subject image
(reference) of a training sample whose target is the other. Training (`train --pairs`) takes the subject image
from the reference object and the target image, box, mask and localization tokens from the target object.
"""

from __future__ import annotations

import pyarrow as pa

METHODS = ("video", "retrieval")

PAIR_SCHEMA = pa.schema(
    [
        ("ref_key", pa.string()),
        ("ref_index", pa.int32()),
        ("target_key", pa.string()),
        ("target_index", pa.int32()),
        ("label", pa.string()),
        ("method", pa.string()),
        ("similarity", pa.float32()),
        ("frame_gap", pa.int64()),
        ("change", pa.float32()),
        ("phash_distance", pa.int32()),
    ]
)
