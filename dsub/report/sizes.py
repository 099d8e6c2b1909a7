"""How much of a run the QC report reads and shows: its sample, examples and display sizes.

Apart from ``gather`` so that the coordinator's memory plan
(``workflow.resources``) reads them without loading the report's readers and
transforms while it checks the inputs.
"""

#: Particles whose images are read for the power spectra.
SPECTRUM_SAMPLE = 256
#: Images of the sample read and reduced to power spectra at once (float32 bytes of each of input and
#: result): the report holds a few copies of one block, never the whole sample.
SPECTRUM_BLOCK_BYTES = 8 * 2**20
#: Example particles shown per half set.
EXAMPLES_PER_HALF = 3
#: Display low-pass: at least this resolution, and never finer than this many pixels.
DISPLAY_RESOLUTION_ANGSTROM = 10.0
DISPLAY_RESOLUTION_PIXELS = 3.0
#: Example images larger than this are shown binned (figures draw them at about this many pixels).
DISPLAY_PIXELS = 128
#: ... and never larger than this, whatever the low-pass: the figure draws each at 190 pixels (1.9 in at 100 dpi),
#: and its drawing library takes about 70 bytes for every pixel given (65 MB more for examples of 256 px than of
#: 128 px, measured 2026-11-30).
DISPLAY_PIXELS_MOST = 256
