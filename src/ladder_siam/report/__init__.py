"""The report: one page comparing runs, in the paper's tables and figures.

:mod:`.inputs` reads each run folder, :mod:`.sections` and :mod:`.analysis_section` build
the sections (Table 1/2/7, training curves, Fig. 3-5), :mod:`.analysis` computes view
distances and gradient maps from a backbone, :mod:`.figures` draws, :mod:`.html` renders,
and :mod:`.build` is the ``report`` step.
"""
