"""The physics of subtraction, written once against an array module ``xp``.

Every function takes arrays and returns arrays; none opens a file. Pass NumPy
arrays to run on the CPU and CuPy arrays to run on a GPU: the code is the same,
except for the Fourier-slice extraction, which has a CUDA kernel of its own
(``_slice_cuda``) checked against the NumPy twin.
"""
