"""Built-in method plug-ins. Each module exposes ``METHOD`` and is registered through the
``dit_bench.methods`` entry-point group, exactly as a third-party plug-in would be."""
