"""console: CLI queries, incident reports, `corral serve` (API and web page)"""
