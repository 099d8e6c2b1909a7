"""The workflow: chunked subtraction into one Zarr store, then export to MRC/STAR/CS."""
