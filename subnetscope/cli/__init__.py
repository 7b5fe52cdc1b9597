"""Command-line entry points; the top-level scripts call `main()` of these modules."""
