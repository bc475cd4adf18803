from django.db import migrations

from deviceplatform.db import use_global_id_sequence


class Migration(migrations.Migration):
    dependencies = [("bulkops", "0001_initial")]

    operations = [use_global_id_sequence("bulkops_bulkoperation")]
