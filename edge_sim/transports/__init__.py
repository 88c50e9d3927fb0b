"""The two ways a scenario's fleet runs, behind one interface (``base.Transport``).

``mqtt``: real ``clue-agent``, ``clue-mds`` and aggregator processes over Mosquitto (``mqtt.py``).
``inprocess``: the same learners in this process, the MdS and the KT channel as function calls
(``inprocess.py``). Both draw the same batches (``edge_sim.inputs``), fill the same records
(``edge_sim.records``) and feed the same report (``edge_sim.report``).
"""

from edge_sim.transports.base import Progress, Transport
from edge_sim.transports.inprocess import InProcessTransport
from edge_sim.transports.mqtt import MqttTransport

__all__ = ["InProcessTransport", "MqttTransport", "Progress", "Transport"]
