"""Semantic search over shards: `mmcl embed` -> `mmcl index build` -> `mmcl search` / `mmcl serve`.

embed.py (embeddings in parts, through the evaluation reader), index.py (faiss: plan for a memory budget,
tune for a target recall, measure), build.py (EMB/ -> INDEX/), query.py (Searcher), serve.py (web page and
JSON API), store.py (the files).
"""
