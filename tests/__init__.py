"""convlog test suite: unit, contract, integration, fault, property, docs."""
