"""How samples reach the model, in one place.

    prepare.py   text (local or gs://) -> train/ and val/ parquet + dataset.json, through Ray
                 Data (`python -m ray_job.prepare_data`)
    corpus.py    the test preset's corpus: prepare.py on this Python's standard library
    checks.py    the data set checked on the driver before Ray starts; a resume's train files
                 found under data.path and fingerprinted
    index.py     which train files a run trains on (names, rows, sizes, footer fingerprints);
                 the validation files read whole
    order.py     the global sample order of an epoch: files permuted, samples shuffled within
                 windows; the cursor; where a resume starts reading
    stream.py    the Ray Data stream the workers train on: read tasks from the cursor, the
                 window shuffle, the rank-major deal, the per-batch position guard
"""
