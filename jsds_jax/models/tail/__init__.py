"""The trained tail: dense projections, the shared sparse head, the optional last blocks, the JSDS
model that ties them together, and the CMC reranker. Trained on cached trunk features."""
