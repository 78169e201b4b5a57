"""Parse OpenMetrics text (stdin) with the reference Prometheus client's strict parser and
print every sample as JSON: [{"family", "type", "name", "labels", "value"}]. A parse error
exits non-zero with the parser's message."""

import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families

samples = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for sample in family.samples:
        samples.append(
            {
                "family": family.name,
                "type": family.type,
                "name": sample.name,
                "labels": dict(sample.labels),
                "value": sample.value,
            }
        )
print(json.dumps(samples))
