"""reacher-three-easy / -hard (TD-MPC2 custom tasks): the stock reacher task with a three-link arm.

The model is the stock dm_control reacher XML edited programmatically: the upper arm is shortened to 0.09 and
renamed ``arm0`` (joint ``shoulder0``, unlimited), a second link ``arm1`` of length 0.09 with a joint
``shoulder1`` limited to +-80 degrees is inserted below it, the hand (length 0.1) hangs off ``arm1`` with its
``wrist`` joint limited to +-80 degrees, and a third motor drives ``shoulder1``. Task, randomisation, reward
and target handling are the stock reacher's (see :mod:`mtdistill_jax.envs.dmc.reacher`).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from dm_control.suite import reacher as dm_reacher

from mtdistill_jax.envs.dmc.reacher import BIG_TARGET, SMALL_TARGET, _Reacher

LINK0_LENGTH = 0.09  # length of the upper link arm0 (stock arm: 0.12)
LINK1_LENGTH = 0.09  # length of the inserted middle link arm1
HAND_TO_FINGER = 0.09  # offset of the fingertip body along the hand (the hand capsule itself stays 0.1 long)
JOINT_LIMIT_DEG = 80  # range (+-degrees) of shoulder1 and wrist (stock wrist: +-160)


def _capsule_fromto(length: float) -> str:
    return f"0 0 0 {length:g} 0 0"


def three_link_model_xml(stock_xml: str | bytes) -> str:
    """The three-link reacher MJCF, built from the stock two-link reacher MJCF."""
    root = ET.fromstring(stock_xml)
    world = root.find("worldbody")
    arm0 = world.find("body[@name='arm']")
    arm0.set("name", "arm0")
    arm0_geom = arm0.find("geom[@name='arm']")
    arm0_geom.set("name", "arm0")
    arm0_geom.set("fromto", _capsule_fromto(LINK0_LENGTH))
    arm0.find("joint[@name='shoulder']").set("name", "shoulder0")

    hand = arm0.find("body[@name='hand']")
    arm0.remove(hand)
    arm1 = ET.SubElement(arm0, "body", name="arm1", pos=f"{LINK0_LENGTH:g} 0 0")
    arm1_geom = ET.SubElement(arm1, "geom", dict(arm0_geom.attrib))  # same capsule radius and material
    arm1_geom.set("name", "arm1")
    arm1_geom.set("fromto", _capsule_fromto(LINK1_LENGTH))
    limit = f"-{JOINT_LIMIT_DEG} {JOINT_LIMIT_DEG}"
    ET.SubElement(arm1, "joint", name="shoulder1", limited="true", range=limit)
    arm1.append(hand)
    hand.set("pos", f"{LINK1_LENGTH:g} 0 0")
    hand.find("joint[@name='wrist']").set("range", limit)
    hand.find("body[@name='finger']").set("pos", f"{HAND_TO_FINGER:g} 0 0")

    actuator = root.find("actuator")
    shoulder = actuator.find("motor[@name='shoulder']")
    shoulder.set("name", "shoulder0")
    shoulder.set("joint", "shoulder0")
    index = list(actuator).index(shoulder)
    actuator.insert(index + 1, ET.Element("motor", name="shoulder1", joint="shoulder1"))
    return ET.tostring(root, encoding="unicode")


class _ReacherThree(_Reacher):
    """Three-link planar reacher (TD-MPC2 ``reacher_three_links``)."""

    def model_xml(self):
        xml, assets = dm_reacher.get_model_and_assets()
        return three_link_model_xml(xml), assets


class ReacherThreeEasy(_ReacherThree):
    """reacher-three-easy: target radius 0.05."""

    name = "reacher-three-easy"
    target_size = BIG_TARGET


class ReacherThreeHard(_ReacherThree):
    """reacher-three-hard: target radius 0.015."""

    name = "reacher-three-hard"
    target_size = SMALL_TARGET
