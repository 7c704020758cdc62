"""Tools around the pipeline: synthetic faces, the demo, the HTML report, benchmarks and the GPU
check. Imports whatever it measures; nothing in the pipeline imports tools, except the
synthetic faces that tests and the demo draw."""
