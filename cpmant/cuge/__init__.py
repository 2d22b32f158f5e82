"""CUGE tasks (CPM-Ant's six) and the demo tasks built from the installed corpus: loaders, CPM-Ant formatting,
metrics."""
