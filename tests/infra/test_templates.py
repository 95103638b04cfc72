"""The Bicep templates parse and hold every security property, role, setting and wire the issue asks for.

Each check in checks.py runs on the real templates and must pass; then on a copy of one template with
one property changed, where it must fail — so removing a security property or a role breaks the build.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.infra import checks
from tests.infra.bicep import Infra, parse
from tests.infra.conftest import INFRA

BICEP_FILES = sorted(INFRA.rglob("*.bicep"))
MODULES = {"identity", "storage", "keyvault", "monitoring", "network", "functionapp", "rbac"}


@pytest.mark.parametrize("path", BICEP_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_template_parses(path: Path) -> None:
    template = parse(path)
    assert template.get("resources") or template.get("modules"), f"{path.name} declares nothing"


def test_modules_by_concern_and_no_registry_modules(infra: Infra) -> None:
    assert {p.stem for p in (INFRA / "modules").glob("*.bicep")} == MODULES
    deployed = {Path(infra.main.module_path(symbol)).stem for symbol in infra.main.modules}
    # graph/: the Microsoft Graph extension module, outside modules/ because checkov cannot parse it
    assert deployed == MODULES | {"federated-credential"}
    assert {p.stem for p in (INFRA / "graph").glob("*.bicep")} == {"federated-credential"}
    for template in infra:
        for symbol, module in template.modules.items():
            assert module["type"] == "local", f"{template.name}.{symbol}: registry modules hide from checkov"


def test_api_versions_support_flex_consumption(infra: Infra) -> None:
    for resource in infra["functionapp"].resources():
        if resource.type.startswith("Microsoft.Web/"):
            assert resource.api_version >= "2023-12-01", (
                f"{resource.symbol}: functionAppConfig needs 2023-12-01+"
            )


@pytest.mark.parametrize("name", sorted(checks.ALL))
def test_check_passes(infra: Infra, name: str) -> None:
    checks.ALL[name](infra)


OWNER = "8e3af657-a8ff-443c-a75c-2fe8c4bcb635"

# (file, text to find exactly once, replacement, the check that must then fail)
MUTATIONS = [
    (
        "modules/rbac.bicep",
        "if ((dataverseCredential == 'certificate') && !empty(deployerPrincipalId))",
        "if (!empty(deployerPrincipalId))",
        "role_assignments",
    ),
    (
        "main.bicep",
        "    dataverseCredential: dataverseCredential\n    storageAccountName",
        "    storageAccountName",
        "role_assignments",
    ),
    ("modules/functionapp.bicep", "value: '32'", "value: '8'", "worker_threads"),
    ("modules/storage.bicep", "allowSharedKeyAccess: false", "allowSharedKeyAccess: true", "storage"),
    ("modules/storage.bicep", "allowBlobPublicAccess: false", "allowBlobPublicAccess: true", "storage"),
    ("modules/storage.bicep", "minimumTlsVersion: 'TLS1_2'", "minimumTlsVersion: 'TLS1_0'", "storage"),
    ("modules/storage.bicep", "supportsHttpsTrafficOnly: true", "supportsHttpsTrafficOnly: false", "storage"),
    ("modules/storage.bicep", "'${syncQueueName}-poison'", "'${syncQueueName}-poisoned'", "storage"),
    ("modules/storage.bicep", "  'reconciliation' // ", "  'reports' // ", "storage"),
    ("modules/storage.bicep", "  'azure-webjobs-secrets' // ", "  // ", "storage"),
    (
        "modules/storage.bicep",
        "concat([deploymentContainer.name], appContainerNames)",
        "appContainerNames",
        "storage",
    ),
    (
        "modules/storage.bicep",
        "defaultAction: restricted ? 'Deny' : 'Allow'",
        "defaultAction: 'Allow'",
        "storage_network",
    ),
    ("modules/storage.bicep", "bypass: 'None'", "bypass: 'AzureServices'", "storage_network"),
    ("modules/storage.bicep", "          id: appSubnetId\n", "          id: ''\n", "storage_network"),
    ("modules/storage.bicep", "value: replace(trim(ip), '/32', '')", "value: replace(ip, '/32', '')",
     "storage_network"),
    ("modules/storage.bicep", "value: replace(trim(ip), '/32', '')", "value: trim(ip)", "storage_network"),
    (
        "main.bicep",
        "    appSubnetId: vnetIntegration ? network.outputs.appSubnetId : ''\n"
        "    allowedIpAddresses: storageAllowedIpAddresses\n",
        "    allowedIpAddresses: storageAllowedIpAddresses\n",
        "storage_network",
    ),
    (
        "main.bicep",
        "param storageAllowedIpAddresses array = []",
        "param storageAllowedIpAddresses array = [\n  '0.0.0.0/0'\n]",
        "storage_network",
    ),
    (
        "modules/network.bicep",
        "            {\n              service: 'Microsoft.Storage'\n            }\n",
        "",
        "virtual_network",
    ),
    (
        "modules/keyvault.bicep",
        "enableRbacAuthorization: true",
        "enableRbacAuthorization: false",
        "key_vault",
    ),
    ("modules/keyvault.bicep", "value: trim(ip)", "value: ip", "key_vault"),
    ("modules/keyvault.bicep", "softDeleteRetentionInDays: 90", "softDeleteRetentionInDays: 7", "key_vault"),
    ("modules/keyvault.bicep", "    enablePurgeProtection: true\n", "", "key_vault"),
    (
        "modules/keyvault.bicep",
        "param networkDefaultAction string = 'Deny'",
        "param networkDefaultAction string = 'Allow'",
        "key_vault",
    ),
    (
        "modules/keyvault.bicep",
        "resource clientSecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = "
        "if ((dataverseCredential == 'secret') && !empty(dataverseClientSecret)) {",
        "resource clientSecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = {",
        "key_vault",
    ),
    (
        "main.bicep",
        "param keyVaultNetworkDefaultAction string = 'Deny'",
        "param keyVaultNetworkDefaultAction string = 'Allow'",
        "key_vault",
    ),
    (
        "modules/network.bicep",
        "service: 'Microsoft.KeyVault'",
        "service: 'Microsoft.Storage'",
        "virtual_network",
    ),
    ("modules/monitoring.bicep", "DisableLocalAuth: true", "DisableLocalAuth: false", "monitoring"),
    ("modules/functionapp.bicep", "httpsOnly: true", "httpsOnly: false", "function_app"),
    ("modules/functionapp.bicep", "      minTlsVersion: '1.2'", "      minTlsVersion: '1.0'", "function_app"),
    (
        "modules/functionapp.bicep",
        "      remoteDebuggingEnabled: false\n",
        "      remoteDebuggingEnabled: false\n      ftpsState: 'Disabled'\n",
        "function_app",
    ),
    (
        "modules/functionapp.bicep",
        "      remoteDebuggingEnabled: false\n",
        "      remoteDebuggingEnabled: false\n      alwaysOn: true\n",
        "function_app",
    ),
    (
        "modules/functionapp.bicep",
        "      remoteDebuggingEnabled: false\n",
        "      remoteDebuggingEnabled: false\n      linuxFxVersion: 'Python|3.11'\n",
        "function_app",
    ),
    (
        "modules/functionapp.bicep",
        "remoteDebuggingEnabled: false",
        "remoteDebuggingEnabled: true",
        "function_app",
    ),
    ("modules/functionapp.bicep", "http20Enabled: true", "http20Enabled: false", "function_app"),
    ("modules/functionapp.bicep", "name: 'FC1'", "name: 'Y1'", "function_app"),
    (
        "modules/functionapp.bicep",
        "type: 'UserAssignedIdentity'",
        "type: 'SystemAssignedIdentity'",
        "function_app",
    ),
    ("modules/functionapp.bicep", "version: '3.11'", "version: '3.10'", "function_app"),
    ("main.bicep", "  dependsOn: [\n    rbac\n  ]\n", "", "function_app"),
    ("modules/functionapp.bicep", "name: 'USER_CACHE_TTL_SECONDS'", "name: 'USER_CACHE_TTL'", "app_settings"),
    (
        "modules/functionapp.bicep",
        "      appSettings: [\n",
        "      appSettings: [\n        {\n          name: 'FUNCTIONS_WORKER_RUNTIME'\n"
        "          value: 'python'\n        }\n",
        "app_settings",
    ),
    (
        "modules/functionapp.bicep",
        "value: 'Authorization=AAD;ClientId=${identityClientId}'",
        "value: 'Authorization=AAD'",
        "app_settings",
    ),
    (
        "modules/functionapp.bicep",
        "name: 'AzureWebJobsStorage__credential'\n          value: 'managedidentity'",
        "name: 'AzureWebJobsStorage__credential'\n          value: 'connectionstring'",
        "app_settings",
    ),
    (
        "main.bicep",
        "param dataverseApiVersion string = 'v9.2'",
        "param dataverseApiVersion string = 'v9.1'",
        "settings_defaults",
    ),
    (
        "main.bicep",
        "param dataverseUrl string\n",
        "param dataverseUrl string = 'https://contoso.crm.dynamics.com'\n",
        "settings_defaults",
    ),
    (
        "modules/rbac.bicep",
        "var keyVaultSecretsUser = '4633458b-17de-408a-b874-0445c86b69e6'",
        f"var keyVaultSecretsUser = '{OWNER}'",
        "role_assignments",
    ),
    (
        "modules/rbac.bicep",
        "  scope: vault\n  properties: {\n    roleDefinitionId: subscriptionResourceId("
        "'Microsoft.Authorization/roleDefinitions', keyVaultSecretsUser)",
        "  scope: storage\n  properties: {\n    roleDefinitionId: subscriptionResourceId("
        "'Microsoft.Authorization/roleDefinitions', keyVaultSecretsUser)",
        "role_assignments",
    ),
    (
        "modules/rbac.bicep",
        "name: guid(applicationInsights.id, identityPrincipalId, monitoringMetricsPublisher)",
        "name: guid(storage.id, identityPrincipalId, monitoringMetricsPublisher)",
        "role_assignments",
    ),
    (
        "modules/rbac.bicep",
        "principalId: identityPrincipalId\n    principalType: 'ServicePrincipal'\n  }\n}\n\n"
        "// Per container, not on the account",
        "principalId: identityPrincipalId\n    principalType: 'User'\n  }\n}\n\n"
        "// Per container, not on the account",
        "role_assignments",
    ),
    (
        "modules/rbac.bicep",
        "resource deployerKeyVaultSecretsOfficer 'Microsoft.Authorization/roleAssignments"
        "@2022-04-01' = if (!empty(deployerPrincipalId)) {",
        "resource deployerKeyVaultSecretsOfficer 'Microsoft.Authorization/roleAssignments@2022-04-01' = {",
        "role_assignments",
    ),
    (
        "modules/rbac.bicep",
        "  name: guid(containers[i].id, identityPrincipalId, storageBlobDataOwner)\n  scope: containers[i]\n",
        "  name: guid(storage.id, identityPrincipalId, storageBlobDataOwner)\n  scope: storage\n",
        "role_assignments",
    ),
    (
        "modules/rbac.bicep",
        "[for i in range(0, length(blobContainerNames)): {",
        "[for i in range(0, 1): {",
        "role_assignments",
    ),
    (
        "main.bicep",
        "    blobContainerNames: storage.outputs.blobContainerNames\n",
        "    blobContainerNames: [\n      'reconciliation'\n    ]\n",
        "role_assignments",
    ),
    (
        "modules/keyvault.bicep",
        "categoryGroup: 'audit'\n        enabled: true",
        "categoryGroup: 'audit'\n        enabled: false",
        "diagnostics",
    ),
    (
        "modules/functionapp.bicep",
        "category: 'FunctionAppLogs'",
        "category: 'AppServiceHTTPLogs'",
        "diagnostics",
    ),
    ("modules/storage.bicep", "category: 'StorageDelete'", "category: 'Transaction'", "diagnostics"),
    (
        "modules/keyvault.bicep",
        "output uri string = vault.properties.vaultUri\n",
        "output uri string = vault.properties.vaultUri\noutput leaked string = dataverseClientSecret\n",
        "secrets_stay_in_key_vault",
    ),
    (
        "main.bicep",
        "    dataverseUrl: dataverseUrl\n",
        "    dataverseUrl: dataverseClientSecret\n",
        "secrets_stay_in_key_vault",
    ),
    (
        "modules/keyvault.bicep",
        "  tags: tags\n  //checkov:skip=CKV_AZURE_189",
        "  tags: union(tags, { hint: webhookSigningSecret })\n  //checkov:skip=CKV_AZURE_189",
        "secrets_stay_in_key_vault",
    ),
    ("main.bicep", "output SERVICE_API_NAME string", "output API_NAME string", "outputs_for_azd"),
    # DATAVERSE_CREDENTIAL: each mode's guarantees
    (
        "modules/keyvault.bicep",
        "if ((dataverseCredential == 'secret') && !empty(dataverseClientSecret))",
        "if (!empty(dataverseClientSecret))",
        "credential_modes",
    ),
    ("modules/functionapp.bicep", "value: dataverseCredential", "value: 'secret'", "credential_modes"),
    (
        "main.bicep",
        "param dataverseCredential string = 'secret'",
        "param dataverseCredential string = 'federated'",
        "credential_modes",
    ),
    ("main.bicep", "  'federated'\n  'certificate'\n])\n@description('DATAVERSE_CREDENTIAL",
     "  'certificate'\n])\n@description('DATAVERSE_CREDENTIAL", "credential_modes"),
    (
        "main.bicep",
        "if ((dataverseCredential == 'federated') && !empty(dataverseAppUniqueName))",
        "if (!empty(dataverseAppUniqueName))",
        "credential_modes",
    ),
    ("main.bicep", "    identityPrincipalId: identity.outputs.principalId\n  }\n}\n\nvar federatedIssuer",
     "    identityPrincipalId: identity.outputs.clientId\n  }\n}\n\nvar federatedIssuer", "credential_modes"),
    (
        "main.bicep",
        "param dataverseAppUniqueName string = ''",
        "param dataverseAppUniqueName string = 'dataverse-app'",
        "credential_modes",
    ),
    ("main.bicep", '"subject":"${identity.outputs.principalId}"', '"subject":"${dataverseClientId}"',
     "credential_modes"),
    (
        "graph/federated-credential.bicep",
        "    'api://AzureADTokenExchange'\n",
        "    'api://AzureADTokenExchange/'\n",
        "credential_modes",
    ),
    ("graph/federated-credential.bicep", "tenantId}/v2.0'", "tenantId}/'", "credential_modes"),
    ("graph/federated-credential.bicep", "  subject: identityPrincipalId\n", "  subject: appUniqueName\n",
     "credential_modes"),
    ("graph/federated-credential.bicep", "extension microsoftGraphV1\n", "", "credential_modes"),
    (
        "graph/federated-credential.bicep",
        "resource app 'Microsoft.Graph/applications@v1.0' existing = {",
        "resource app 'Microsoft.Graph/applications@v1.0' = {",
        "credential_modes",
    ),
]


@pytest.mark.parametrize(
    ("relative", "old", "new", "check"),
    MUTATIONS,
    ids=[f"{m[3]}:{m[0].split('/')[-1]}:{m[1].strip().splitlines()[0][:40]}" for m in MUTATIONS],
)
def test_check_fails_on_mutated_template(
    infra: Infra, tmp_path: Path, relative: str, old: str, new: str, check: str
) -> None:
    text = (INFRA / relative).read_text()
    assert text.count(old) == 1, f"mutation no longer applies to {relative}; update it: {old!r}"
    mutated = tmp_path / Path(relative).name
    mutated.write_text(text.replace(old, new))
    with pytest.raises(AssertionError):
        checks.ALL[check](infra.with_file(relative, mutated))
