"""Reports: Markdown/HTML and PNG plots computed only from stored results."""
