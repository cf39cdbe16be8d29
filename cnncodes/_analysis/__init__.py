"""Analysis: the layer sweep, learning curves, the advisor's rules and measurements, HTML reports."""
