"""Export: the chosen point, the output folder, the exported programs and the report."""
