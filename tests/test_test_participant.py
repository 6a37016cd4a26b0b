"""Removing a test participant never touches a real one, even under the same accession."""

from __future__ import annotations

import datetime

import attrs

from appliance.state import StatePaths
from appliance.storage.index import StoredInstance
from appliance.storage.store import InstanceStore
from appliance.worklist.store import WorklistItem, WorklistStore

WHEN = datetime.datetime(2026, 12, 1, 9, tzinfo=datetime.UTC)


def instance(uid: str, study: str) -> StoredInstance:
    return StoredInstance(
        sop_instance_uid=uid,
        storage_path=f"aa/bb/{uid}.dcm",
        file_size=1,
        storage_hash="0" * 64,
        study_instance_uid=study,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        created_at=WHEN.isoformat(),
        accession_number="ACC-SHARED",
    )


async def test_removing_a_test_item_spares_a_real_participant_with_its_accession(tmp_path):
    paths = StatePaths(tmp_path)
    worklist, images = WorklistStore(paths), InstanceStore(paths)
    worklist.open()
    images.open()
    try:
        test = WorklistItem("ACC-SHARED", "SELFTEST", "SELFTEST^A", WHEN, is_test=True)
        _, stored_test = worklist.create(test)
        # The test item is archived, then the cloud reuses the accession for a real woman.
        worklist.archive(WHEN + datetime.timedelta(days=2), WHEN + datetime.timedelta(days=2))
        _, real = worklist.create(attrs.evolve(test, patient_id="9990001", is_test=False))
        for uid, study in (
            ("1.1", stored_test.study_instance_uid),
            ("2.1", real.study_instance_uid),
        ):
            images.database.run_sync(images.index.insert, instance(uid, study))

        study = await worklist.write(worklist.remove_test_item, "ACC-SHARED", True)
        removed = await images.remove_test_study("ACC-SHARED", study, True)

        assert study == stored_test.study_instance_uid
        assert removed == 1
        assert worklist.get("ACC-SHARED") == real  # the real item is still offered
        assert [i.sop_instance_uid for i in images.reader.all_instances()] == ["2.1"]
        assert await worklist.write(worklist.remove_test_item, "ACC-SHARED", True) is None
    finally:
        images.close()
        worklist.close()
