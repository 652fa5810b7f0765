"""Model cards shipped with compatzoo, installed as the package ``compatzoo.model_cards``:
one folder per named bundle (README.md card + spec.yaml that trains it, and the bundle's
files where its weights are shipped). ``compatzoo.list_bundles()`` lists them."""
