from django.db import migrations

# Defined terms of Modality (0008,0060), DICOM PS3.3 C.7.3.1.1.1 (current, not retired).
MODALITIES = {
    "ANN": "Annotation", "AR": "Autorefraction", "ASMT": "Content Assessment Results", "AU": "Audio",
    "BDUS": "Bone Densitometry (ultrasound)", "BI": "Biomagnetic imaging", "BMD": "Bone Densitometry (X-Ray)",
    "CFM": "Confocal Microscopy", "CR": "Computed Radiography", "CT": "Computed Tomography",
    "CTPROTOCOL": "CT Protocol (Performed)", "DMS": "Dermoscopy", "DG": "Diaphanography",
    "DOC": "Document", "DX": "Digital Radiography", "ECG": "Electrocardiography", "EEG": "Electroencephalography",
    "EMG": "Electromyography", "EOG": "Electrooculography", "EPS": "Cardiac Electrophysiology",
    "ES": "Endoscopy", "FID": "Fiducials", "GM": "General Microscopy", "HC": "Hard Copy",
    "HD": "Hemodynamic Waveform", "IO": "Intra-Oral Radiography", "IOL": "Intraocular Lens Data",
    "IVOCT": "Intravascular Optical Coherence Tomography", "IVUS": "Intravascular Ultrasound",
    "KER": "Keratometry", "KO": "Key Object Selection", "LEN": "Lensometry", "LS": "Laser surface scan",
    "MG": "Mammography", "MR": "Magnetic Resonance", "M3D": "Model for 3D Manufacturing",
    "NM": "Nuclear Medicine", "OAM": "Ophthalmic Axial Measurements", "OCT": "Optical Coherence Tomography",
    "OP": "Ophthalmic Photography", "OPM": "Ophthalmic Mapping", "OPT": "Ophthalmic Tomography",
    "OPTBSV": "Ophthalmic Tomography B-scan Volume Analysis", "OPTENF": "Ophthalmic Tomography En Face",
    "OPV": "Ophthalmic Visual Field", "OSS": "Optical Surface Scan", "OT": "Other", "PA": "Photoacoustic",
    "PLAN": "Plan", "POS": "Position Sensor", "PR": "Presentation State", "PT": "Positron emission tomography (PET)",
    "PX": "Panoramic X-Ray", "REG": "Registration", "RESP": "Respiratory Waveform", "RF": "Radio Fluoroscopy",
    "RG": "Radiographic imaging (conventional film/screen)", "RTDOSE": "Radiotherapy Dose",
    "RTIMAGE": "Radiotherapy Image", "RTINTENT": "Radiotherapy Intent", "RTPLAN": "Radiotherapy Plan",
    "RTRAD": "RT Radiation", "RTRECORD": "RT Treatment Record", "RTSEGANN": "Radiotherapy Segment Annotation",
    "RTSTRUCT": "Radiotherapy Structure Set", "RWV": "Real World Value Map", "SEG": "Segmentation",
    "SM": "Slide Microscopy", "SMR": "Stereometric Relationship", "SR": "SR Document",
    "SRF": "Subjective Refraction", "STAIN": "Automated Slide Stainer", "TEXTUREMAP": "Texture Map",
    "TG": "Thermography", "US": "Ultrasound", "VA": "Visual Acuity", "XA": "X-Ray Angiography",
    "XAPROTOCOL": "XA Protocol (Performed)", "XC": "External-camera Photography",
}


def add_modalities(apps, schema_editor):
    Modality = apps.get_model("centers", "Modality")
    for code, name in MODALITIES.items():
        Modality.objects.update_or_create(code=code, defaults={"name": name})


class Migration(migrations.Migration):
    dependencies = [("centers", "0001_initial")]
    operations = [migrations.RunPython(add_modalities, migrations.RunPython.noop)]
