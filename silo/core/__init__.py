"""The base layer: configs, documents and licences, fingerprints, model loading, text spans and atomic
file helpers. Every other layer may import it; it imports none of them."""
